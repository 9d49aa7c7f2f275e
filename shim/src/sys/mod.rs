//! Thin, safe wrappers over kernel interfaces. Every raw syscall cowsnap makes
//! outside the restorer blob is wrapped here once, typed, with a `// SAFETY:` line.
