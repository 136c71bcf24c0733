"""Training tasks for the one loop (:mod:`ambient_ray.train.loop`): each gives its network, batches and loss."""
