"""L7 route selection for the waypoint: pure decisions over typed routes (no I/O).

logical (the Service the client addressed) -> route (`find_route` / `find_vs_route`) ->
backend (`pick_backend`) -> endpoint (chosen later, by the load balancer).
"""
from .backend import pick_backend, pick_vs_destination, pick_weighted
from .match import (RequestInfo, RouteMatch, VSRouteMatch, bound_routes, bound_virtual_services,
                    find_route, find_vs_route, match_holds, path_matches, vs_match_holds)

__all__ = ["RequestInfo", "RouteMatch", "VSRouteMatch", "bound_routes", "bound_virtual_services",
           "find_route", "find_vs_route", "match_holds", "path_matches", "vs_match_holds",
           "pick_backend", "pick_vs_destination", "pick_weighted"]
