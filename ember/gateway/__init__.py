"""The gateway in front of the models (issue 24): virtual keys (keys), rate limits (limits), budgets
(budgets), and usage metering with prices (usage); `Gateway` (guard) ties them to a request."""
