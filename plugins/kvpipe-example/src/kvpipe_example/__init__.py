"""An example kvpipe plugin distribution (see :mod:`kvpipe_example.plugin`)."""
