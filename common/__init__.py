"""Code shared by preprocessing and training: store format, geometry, configs, errors."""
