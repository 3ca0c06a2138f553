"""The window's views: jobs panel, layer picker, method forms, units browser, unit view, layer overview."""
