"""Real pretrained weights offline (e5-small, minilm-l6, smollm2-135m) next to any hub id or local folder."""
