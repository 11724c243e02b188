//! kscope colorer.
