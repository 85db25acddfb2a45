"""The status page of CONTRACT §8: access control (tokens, sessions, Host names), the pure HTML
renderer, the page assembly for the HTTP listener, and the stylesheet and script it serves.
"""
