"""Readers the environments share: what goes wrong and the skip counts (`errors`),
bounded image decoding (`images`), images in folders and zip archives and safe extraction
(`archives`), Parquet / CSV / `datasets` tables (`tables`), the Hugging Face hub cache
(`hub`)."""
