"""The operator CLI, ``fleet``: publish jobs, follow them, keys, storage, audit."""
