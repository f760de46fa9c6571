"""One OPD step as a library, the same in every engine: settings, data, bridge, sides,
teaching, rollout, scoring, credit, update; no recipe and no trainer-framework types."""
