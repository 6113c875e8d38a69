"""annotate: captions and QA pairs for the seven SARLANG-1M applications, with automatic QC."""
