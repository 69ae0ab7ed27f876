"""mlxlab's Hydra sweeper, registered where Hydra looks for plugins (the `hydra_plugins`
namespace); the sweeper itself is mlxlab.sweeps.search.sweeper."""
