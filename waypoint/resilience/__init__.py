"""Resilience decisions for the waypoint: retries, retry budgets, outlier detection, circuit
breaking and load balancing -- pure or loop-owned state, time and randomness injected, no I/O."""
from .balancer import Algorithm, Balancer, BalancerConfig, WeightedEndpoint, SlowStart, hash_key
from .budget import RetryBudget, RetryBudgetConfig, RetryBudgets, budget_config
from .circuit import (Admission, CircuitLimits, ConnectionAction, ConnectionPlan, OverflowReason,
                      PoolCounters, admit_request, connection_reusable, idle_expired, plan_connection)
from .outlier import Ejection, EjectionCause, OutlierConfig, OutlierDetector, ResultKind
from .retry import (DEFAULT_RETRY_POLICY, NO_RETRY, AttemptOutcome, BudgetVerdict, GiveUpReason,
                    OutcomeKind, RetryDecision, RetryOn, RetryPolicy, attempt_count_header,
                    backoff_delay, hosts_to_avoid, is_retriable, policy_from_http_route,
                    policy_from_virtual_service, should_retry)

__all__ = [
    "Algorithm", "Balancer", "BalancerConfig", "WeightedEndpoint", "SlowStart", "hash_key",
    "RetryBudget", "RetryBudgetConfig", "RetryBudgets", "budget_config",
    "Admission", "CircuitLimits", "ConnectionAction", "ConnectionPlan", "OverflowReason", "PoolCounters",
    "admit_request", "connection_reusable", "idle_expired", "plan_connection",
    "Ejection", "EjectionCause", "OutlierConfig", "OutlierDetector", "ResultKind",
    "DEFAULT_RETRY_POLICY", "NO_RETRY", "AttemptOutcome", "BudgetVerdict", "GiveUpReason", "OutcomeKind",
    "RetryDecision", "RetryOn", "RetryPolicy", "attempt_count_header", "backoff_delay", "hosts_to_avoid",
    "is_retriable", "policy_from_http_route", "policy_from_virtual_service", "should_retry",
]
