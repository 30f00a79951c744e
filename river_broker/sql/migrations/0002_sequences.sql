-- river_broker schema, version 2: sequences (SPEC §4).
-- Messages sharing a sequence_key run one at a time in publish order. One message per key is
-- the head (available, scheduled, reserved, or discarded while the key is halted); the rest
-- wait as 'pending', a state the fetch never reads.

-- Position within the sequence. NULL means "its id"; a retry that takes over the head gets the
-- head's position, so it comes before every message published after the original.
ALTER TABLE {schema}.message ADD COLUMN seq_order bigint;
-- A discarded head lets its key move on instead of halting it.
ALTER TABLE {schema}.message ADD COLUMN continue_on_discard boolean NOT NULL DEFAULT false;

-- Serves promote_next_in_sequence (first pending message of a key) and pending counts.
CREATE INDEX message_sequence_pending_idx
    ON {schema}.message (sequence_key, (coalesce(seq_order, id)), id)
    WHERE state = 'pending';

CREATE TABLE {schema}.sequence (
    key         text        PRIMARY KEY,
    -- The message currently allowed to run (NULL only inside the transaction creating the key).
    head_id     bigint,
    state       text        NOT NULL DEFAULT 'active',
    halted_at   timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sequence_state_valid CHECK (state IN ('active', 'halted'))
);

-- Serves lock_sequences_of_heads / promote_next_in_sequence (which keys did these heads hold).
CREATE INDEX sequence_head_idx ON {schema}.sequence (head_id);
