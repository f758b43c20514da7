"""GeoGuessr on OpenStreetView-5M: the environment (`env`, registered as `osv5m` and
`geoguessr`), answer parsing (`answer`), the distance and administrative-level reward with
its curriculum (`reward`), countries, regions and reverse geocoding (`geography`), and
OSV-5M's official metrics (`metrics`)."""
