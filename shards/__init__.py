"""Raw dataset layouts -> WebDataset shards -> batches."""
