"""Files a run reads and writes: the input pictures (`source`), PNG names that never overwrite, atomic
saves and the record stored in every PNG (`output`). May import `core` and `errors`."""
