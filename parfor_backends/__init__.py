"""parfor's built-in backends, each a plugin registered through the ``parfor`` entry points."""
