"""Data files that ship with Neuron Studio (word lists, styles, icons, screenshots); installed beside `app` and
`labelers` so that code can find them relative to its own package."""
