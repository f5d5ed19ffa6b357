"""Datasets as they come: WebDataset/img2dataset tar shards, Parquet, token arrays."""
