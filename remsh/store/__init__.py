"""Where a master keeps what must outlive it: jobs, their per-slave records
and their output.  :mod:`remsh.store.base` says what a store holds and
promises; :mod:`remsh.store.sqlite` is the default store, one master per
file."""
