-- Argo CD health for trimtab's ModelDeployment and TrainingJob (trimtab.io/v1alpha1).
-- Reads only .status (phase, conditions, rollout, autoscaling) and metadata.generation.
-- Lua 5.1, as Argo CD's gopher-lua runs it; tests/test_argocd_health.py runs it with lupa.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function text(value, fallback)
  if value == nil or value == "" then
    return fallback
  end
  return value
end

local function result(state, message)
  hs.status = state
  hs.message = message
  return hs
end

if obj.status == nil or obj.status.phase == nil then
  return result("Progressing", "Waiting for trimtab to report status")
end
local status = obj.status

-- Status written for an older spec says nothing about the current one.
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  return result("Progressing", "Waiting for trimtab to observe generation " .. generation)
end

if obj.kind == "TrainingJob" then
  local failed = condition(status, "Failed")
  if status.phase == "Failed" or (failed ~= nil and failed.status == "True") then
    local why = failed and text(failed.message, failed.reason) or nil
    return result("Degraded", text(status.message, text(why, "Training failed")))
  end
  if status.phase == "Succeeded" then
    return result("Healthy", text(status.message, "Training succeeded"))
  end
  if status.phase == "Suspended" then
    return result("Suspended", text(status.message, "Suspended by spec.suspend"))
  end
  if status.phase == "Queued" then
    return result("Progressing", text(status.message, "Waiting for Kueue to admit the job"))
  end
  if status.phase == "Restarting" then
    local restarts = status.restarts or 0
    return result("Progressing", text(status.message, "Restarting from the last checkpoint") ..
      " (restarts: " .. restarts .. ")")
  end
  if status.phase == "Running" then
    -- Like a batch Job: running is progress; only completion is Healthy.
    local workers = ""
    if status.workersReady ~= nil and status.workers ~= nil then
      workers = " (" .. status.workersReady .. "/" .. status.workers .. " workers ready)"
    end
    return result("Progressing", text(status.message, "Running") .. workers)
  end
  -- Pending, Starting.
  return result("Progressing", text(status.message, status.phase))
end

-- ModelDeployment.
local degraded = condition(status, "Degraded")
if status.phase == "Degraded" or (degraded ~= nil and degraded.status == "True") then
  local why = degraded and text(degraded.message, degraded.reason) or nil
  return result("Degraded", text(status.message, text(why, "Degraded")))
end

-- A Gateway (or istiod) refused the route the rollout writes: no request reaches the model
-- through it.
local route = condition(status, "RouteAccepted")
if route ~= nil and route.status == "False" then
  return result("Degraded", "Route not accepted: " .. text(route.message, route.reason))
end

local rollout = status.rollout
if rollout ~= nil then
  if rollout.phase == "RolledBack" then
    return result("Degraded", "Rolled back revision " .. text(rollout.failedRevision, "?") ..
      ": " .. text(rollout.reason, "analysis failed"))
  end
  if rollout.phase == "FellBack" then
    return result("Degraded", "Fell back to the last known-good revision " ..
      text(rollout.stableRevision, "?") .. ": " .. text(rollout.reason, "SLO breached"))
  end
  if rollout.phase == "Paused" then
    return result("Suspended", "Rollout paused: " .. text(rollout.reason, "waiting for promotion"))
  end
end

local metrics = condition(status, "MetricsAvailable")
if metrics ~= nil and metrics.status == "False" then
  return result("Suspended", "Metrics unavailable, no scale-down: " ..
    text(metrics.message, text(metrics.reason, "no data")))
end

if rollout ~= nil and (rollout.phase == "Shadow" or rollout.phase == "Canary") then
  local message = "Rollout of " .. text(rollout.candidateRevision, "a new revision")
  if rollout.phase == "Shadow" then
    message = message .. ": shadow traffic"
  elseif rollout.weights ~= nil and rollout.weights.candidate ~= nil then
    message = message .. ": canary at " .. rollout.weights.candidate .. "%"
  end
  return result("Progressing", message)
end

if status.phase == "Ready" then
  local ready = condition(status, "Ready")
  if ready ~= nil and ready.status == "False" then
    return result("Progressing", text(ready.message, "Replicas are not ready"))
  end
  if rollout ~= nil and rollout.phase == "Watching" then
    return result("Healthy", "Promoted " .. text(rollout.stableRevision, "revision") ..
      "; watching it against the SLO")
  end
  return result("Healthy", text(status.message, "All replicas are ready"))
end

-- Pending, Progressing.
return result("Progressing", text(status.message, status.phase))
