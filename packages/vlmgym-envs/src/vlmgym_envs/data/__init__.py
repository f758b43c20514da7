"""Readers the environments share: safe archive extraction and image decoding
(`archives`), Parquet / CSV / `datasets` tables (`tables`), the Hugging Face hub cache
(`hub`)."""
