"""Task types (classification, pairs, WSC, NER, reading comprehension, multiple choice): reader, head, metric."""
