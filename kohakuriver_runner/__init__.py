"""kohakuriver_runner: see ARCHITECTURE.md."""
