//! Dump: freeze a process tree (or a cgroup), seize every thread, collect its
//! state and memory with each physical page stored once, write an image.
//! A failed dump must leave every task running untouched and no image behind.
