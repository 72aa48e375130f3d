"""The merge engine (private): the state of a greedy MDL merge in progress, and what it is built from.

`spd_math.merge.merge_iteration` runs the loop (docs/math.md §3-§7); the state it advances, and that the pair
samplers read costs from, lives here. Nothing here is public API. By role:

Tensors and compiled code
    backend       which implementation (NumPy or torch) a hot-loop primitive takes for a tensor
    kernels       Numba-compiled CPU kernels and the `compiled` decorator (also used by activations, distances and replay)
    bitsets       activation masks packed 64 samples to a word, and counting their overlaps

Setting up a merge
    coactivation  the initial masks and exact coactivation counts, from activations in any accepted form
    store         exact group coactivation counts by slot, in the narrowest integer type that holds them

Costs and candidates
    cost_view     what a merge state offers the samplers and the merge loop (protocols), and a matrix's cost view
    ceilings      cost ceilings: an upper bound of a pair's cost that reads no coactivation
    pool          the range sampler's candidate pool: pairs whose cost was at most a level
    pool_policy   when the scalable state rebuilds its pool, and which floor and level a new one gets

The state
    state         the merge states (scalable, dense, switching between them) and `group_state`, which picks one
"""
