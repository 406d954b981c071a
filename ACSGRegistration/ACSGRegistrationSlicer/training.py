"""Fine-tuning's Slicer side: pairs of the scene cropped into a crops folder, and the loss chart."""

import vtk

import slicer

from ACSGRegistrationLib.errors import InputError

from .inputs import checkInputs


def sceneCrops(pairs, folder: str, prepareInput) -> list:
    """Crop pairs of the scene (dicts of nodes and labels; ``prepareInput``: the registration's input rules)
    into ``folder``; each pair's two crops share a level of their own, so that they are paired with each other
    (both directions) and nothing else. A pair whose nodes were deleted is refused by name."""
    from ACSGRegistrationLib.crops import CropRecord, write_crop
    records = []
    for k, a in enumerate(pairs):
        for side in ("fixed", "moving"):
            if a.get(side) is None or a[side].GetScene() is None:
                raise InputError(f"scene pair {k + 1}: its {side} volume was deleted; clear the pairs and add "
                                 "them again")
        checkInputs(a["fixed"], a["moving"], a.get("fixedSegmentation"), a.get("movingSegmentation"))
        for side in ("fixed", "moving"):
            prepared = prepareInput(a[side], a.get(side + "Segmentation"), a.get(side + "Label"), side)
            name = f"scene{k:03d}_{side}"
            image, label = write_crop(folder, name, prepared.image, prepared.label)
            records.append(CropRecord(name, name, f"scene pair {k}", image, label))
    return records

def newLossChart(title: str):
    """A table and a plot chart of the training loss, filled step by step (``appendLoss``)."""
    scene = slicer.mrmlScene
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{title} loss"))
    for name in ("step", "total loss"):
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        table.GetTable().AddColumn(column)
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{title} loss"))
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("step")
    series.SetYColumnName("total loss")
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{title} loss"))
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{title}: training loss")
    chart.SetXAxisTitle("step")
    chart.SetYAxisTitle("loss")
    return table, chart

def appendLoss(table, step, loss):
    t = table.GetTable()
    row = t.InsertNextBlankRow()
    t.SetValue(row, 0, vtk.vtkVariant(float(step)))
    t.SetValue(row, 1, vtk.vtkVariant(float(loss)))
    t.Modified()
    table.Modified()
