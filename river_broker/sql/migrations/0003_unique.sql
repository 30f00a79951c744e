-- river_broker schema, version 3: unique messages (SPEC §5).
-- A message with a unique_key is refused while another row with the same key is in one of the
-- states named by its unique_states bitmask. Enforced by a partial unique index, as River does
-- (no advisory lock, no read-then-insert race, works for batch inserts too).

-- The bit of each state in unique_states (available 1, scheduled 2, pending 4, reserved 8,
-- completed 16, discarded 32). IMMUTABLE: it is used in the index predicate below.
CREATE FUNCTION {schema}.state_bit(state text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
    SELECT (CASE state
        WHEN 'available' THEN 1
        WHEN 'scheduled' THEN 2
        WHEN 'pending'   THEN 4
        WHEN 'reserved'  THEN 8
        WHEN 'completed' THEN 16
        WHEN 'discarded' THEN 32
        ELSE 0 END)::smallint
$$;

ALTER TABLE {schema}.message ADD COLUMN unique_states smallint;
-- For keys unique in a finished state: the end of the uniqueness period; the finished row is
-- kept until then, and cleaned after.
ALTER TABLE {schema}.message ADD COLUMN unique_until timestamptz;

-- Serves the ON CONFLICT of every insert, and find_unique_holder.
CREATE UNIQUE INDEX message_unique_idx ON {schema}.message (unique_key)
    WHERE unique_key IS NOT NULL AND unique_states IS NOT NULL
      AND (unique_states & {schema}.state_bit(state)) <> 0;

-- Serves clean_unique_finished.
CREATE INDEX message_unique_until_idx ON {schema}.message (unique_until)
    WHERE unique_until IS NOT NULL AND state IN ('completed', 'discarded');
