"""The medical image viewer: images of a dataset rendered server-side, per-site statistics."""
