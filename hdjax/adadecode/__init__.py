"""AdaDecode (arXiv 2506.03700): exit heads (`heads`), their training (`train`) and adaptive decoding (`decode`)."""
