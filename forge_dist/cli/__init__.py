"""The ``forge-dist`` command. Never imports TensorFlow."""
