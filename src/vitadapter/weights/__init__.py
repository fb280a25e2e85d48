"""The bottom layer for files: fetching weights (``fetch``: Hub repos, release URLs, caches; ``download``:
transfers under time limits), reading them safely (``read``) and writing files atomically
(``staging``). It knows no model class: models and the hub module above it build on it."""
