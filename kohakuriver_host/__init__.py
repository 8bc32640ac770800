"""kohakuriver_host: see ARCHITECTURE.md."""
