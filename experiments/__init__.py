"""Experiments beside the method: each uses the core (`neon`) as a library and plugs into the `neon` command
through entry points (pyproject.toml); the core never imports them."""
