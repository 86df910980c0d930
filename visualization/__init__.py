"""The dashboard: pages, WebSocket streams, figures and the image viewer."""
