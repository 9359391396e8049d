"""FL-tune a tiny BERT on a toy task, then show that the merged plain checkpoint gives the same logits.

python examples/tiny_demo.py
"""

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

from fltuning import FLTuningConfig, get_fl_model


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=2
    )
    fl_config = FLTuningConfig(num_units=16, modules_to_save=["classifier"])
    model = get_fl_model(BertForSequenceClassification(config), fl_config)
    model.print_trainable_parameters()
    # toy task: is token 7 in the sequence?
    ids = torch.randint(10, 100, (64, 12))
    labels = torch.randint(0, 2, (64,))
    ids[labels == 1, 3] = 7
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    accuracy = (tuned.argmax(-1) == labels).float().mean().item()
    with tempfile.TemporaryDirectory() as tmp:
        plain = model.merge_and_unload()
        plain.save_pretrained(tmp)
        reloaded = BertForSequenceClassification.from_pretrained(tmp).eval()
        with torch.no_grad():
            merged = reloaded(input_ids=ids).logits
    print(
        f"train accuracy {accuracy:.3f}; merged checkpoint intermediate_size={reloaded.config.intermediate_size}; "
        f"max |merged - unmerged| = {(merged - tuned).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
