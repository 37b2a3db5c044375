//! hop CLI
