"""Sandboxes: durable state, copy-on-write root disks (the manager sits on top of these)."""
