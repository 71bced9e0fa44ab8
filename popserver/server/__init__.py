"""The network side: a threaded socketserver listener and one handler per connection."""
