//! kscope VMM.
