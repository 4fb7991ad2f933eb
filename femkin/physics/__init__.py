"""Physics as pure UFL forms: no PETSc, no I/O."""
