"""moetier's built-in backend plugins. Each module is registered through the `moetier` entry-point
group, exactly like a third-party plugin."""
