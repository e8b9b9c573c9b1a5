"""What every pipeline uses: configuration, the stack, Postgres, services, lineage and events."""
