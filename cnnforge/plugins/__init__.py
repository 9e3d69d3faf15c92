"""cnnforge's built-in plugins, registered through the same entry points and public API as
anybody else's."""
