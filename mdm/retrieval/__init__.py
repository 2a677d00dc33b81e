"""Getting objects from the sites: targets, single-flight fetches, prefetch, the writer."""
