"""Small blocks composed by ``mass_nnu.model.mass_model`` (as in dynamic_network_architectures)."""
