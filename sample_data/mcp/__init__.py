"""Small real MCP servers for the demo and the tests: the tools of the demo organisation (helpdesk, billing),
served over stdio or streamable HTTP by the official ``mcp`` SDK. Each appends every call it receives to the file
named by ``CUSTODY_MCP_CALL_LOG`` (when set), so a test can show a denied call never reached it."""
