"""Imports every decoding method so that it registers itself in `hdjax.api.METHODS`."""
