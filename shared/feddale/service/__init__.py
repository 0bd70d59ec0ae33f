"""Service plumbing shared by the four services: settings, auth, limits, metrics, HTTP, serving."""
