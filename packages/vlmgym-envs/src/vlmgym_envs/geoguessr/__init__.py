"""GeoGuessr on OpenStreetView-5M: the environments (`env`: `osv5m`, alias `geoguessr`, and
`geospot`), the OSV-5M CSV and images (`dataset`), answer parsing (`answer`), the default
level and distance reward with its curriculum (`reward`), the earlier version's reward
(`reward_v1`), the geospot reward (`geospot`), countries, regions and reverse geocoding
(`geography`), names to points offline (`gazetteer`), and OSV-5M's official metrics and the
training-step metrics (`metrics`)."""
