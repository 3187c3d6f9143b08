"""Host-side bookkeeping: sequences, KV block manager, scheduler."""
