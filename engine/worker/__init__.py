"""Device side: batch building, model runner, sampler."""
